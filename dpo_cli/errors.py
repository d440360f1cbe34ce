"""Errors meant for people, not for debuggers.

A `UserError` is bad input the user can fix (a missing file, a misspelled recipe key, a malformed line). The CLI
prints its message as one line and exits non-zero; any other exception is a bug and keeps its traceback.
"""

import reprlib


class UserError(Exception):
    """One clear line: where (file, line or key), what is wrong, and what to do about it."""

    exit_code = 2


SHOWN_CHARS = 200


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """The repr of `value` for an error line: at most `limit` characters, whatever the value's size.

    Values in error lines come from files people are handed. A YAML alias bomb expands to billions of items, a number
    can have 5,000 digits (whose repr Python refuses), a string can be a gigabyte: a plain repr would cost all of
    that in memory and on the terminal. Only the start of each part is looked at.
    """
    text = _BOUNDED_REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _BoundedRepr(reprlib.Repr):
    def __init__(self):
        super().__init__()
        self.maxlevel, self.maxdict, self.maxlist, self.maxtuple, self.maxset = 3, 6, 6, 6, 6
        self.maxfrozenset, self.maxdeque, self.maxarray = 6, 6, 6
        self.maxstring, self.maxlong, self.maxother = SHOWN_CHARS, 40, SHOWN_CHARS

    def repr_int(self, value: int, level: int) -> str:
        if value.bit_length() > 3000:  # repr refuses over 4,300 digits, and costs quadratic time below
            return f"<an integer of about {int(value.bit_length() * 0.30103):,} digits>"
        return super().repr_int(value, level)

    def repr_bytes(self, value: bytes, level: int) -> str:
        return repr(value[: self.maxstring]) + ("..." if len(value) > self.maxstring else "")

    def repr_dict(self, value: dict, level: int) -> str:  # reprlib sorts every key first; a dict keeps its order
        if not value:
            return "{}"
        if level <= 0:
            return "{...}"
        items = [f"{self.repr1(k, level - 1)}: {self.repr1(v, level - 1)}" for k, v in list(value.items())[:6]]
        return "{" + ", ".join(items) + (", ..." if len(value) > self.maxdict else "") + "}"


_BOUNDED_REPR = _BoundedRepr()
