"""The built-in tiny Llama and its cheerful-vs-gloomy pairs (tiny), and `make demo` (`python -m dpo_cli.demo`)."""
