"""The node's network resources: the plan of one (pure) and the kernel work that makes it."""
