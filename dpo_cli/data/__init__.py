"""Preference data: read every format and container, check each record, tokenize as TRL does, cache the result.

May import: config, errors, files (and its own modules). Never a model, never torch; it prints nothing (functions
return reports, the commands render them). Its modules, bottom to top:

  formats   what a record looks like in each format, and how it becomes (prompt, chosen, rejected)
  decode    a record as read (place, raw text, value or problem) and its JSON decoded with hostile input bounded
  json_text JSON lines and JSON arrays read from a byte stream, one record at a time
  readers   files and containers: .jsonl/.json (.gz, .zst), .parquet, save_to_disk folders; file-level problems
  records   every record of a file becomes pairs or an InvalidRecord with its place (ReadOptions, ReadResult)
  skipped   records set aside: the on_invalid policy, the summary by reason, skipped-<split>.jsonl
  templates which chat template (built-in name, file, the model's own) and rendering it in a bounded sandbox
  tokenize  token ids exactly as TRL 1.16 makes them, one pair or one bounded `datasets.map` batch
  arrow     the two Arrow tables of a prepared split and how a pair's texts are stored in them
  cache     where prepared splits are kept: keys, the lock, opening (damaged: None) and building an entry
  prepare   a split's files streamed into Arrow and tokenized on all cores, through the cache (PreparedSplit)
  split     which pairs a split is: SplitRequest, and the held-out part of data.eval_split
  load      the entry point of train and eval: a SplitRequest in, pairs and a SplitReport out
  check     `dpo-cli data check`: the report (a dict) of a set of files
"""
