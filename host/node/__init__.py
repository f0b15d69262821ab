"""The node: a :class:`~sandbus.host.lifecycle.PluginManager` wired onto a :class:`~sandbus.bus.PluginBus`
(node.py), and the host functions through which plugins reach the bus and the network (hostfuncs.py, with
netguard.py for addresses and sendlimit.py for send rates)."""
