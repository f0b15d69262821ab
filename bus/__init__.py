"""The PluginBus over NATS (arrives with the bus issue)."""

__all__: list[str] = []
