"""The host side of the agent channel: the typed client, the few calls a monitor makes without
protobuf (lite), stdio relays, the monitor's forwarding proxy, and the transport."""
