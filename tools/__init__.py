"""Tools: the gputrace CLI, demo, docs generator, dev stack and dev keys. The only layer that
may import services."""
