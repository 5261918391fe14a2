"""The host side of resources: network namespaces, bridges and taps."""
