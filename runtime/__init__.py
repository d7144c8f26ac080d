"""What every layer of the running service shares: its settings (``config``), log output (``logs``),
Prometheus metrics (``metrics``), OpenTelemetry traces (``tracing``), the crash points the tests
kill the process at (``crashpoints``), the operations endpoints' guard (``ops``) and the handling of
untrusted text (``untrusted``). Nothing here imports the bot, the agent, the jobs or the stores."""
