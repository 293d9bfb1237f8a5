"""The node's network resources: the plan of one (pure) and the kernel work that makes it."""

# The provisioners' package loads first, whichever side is imported first: its network
# provisioner uses these modules, and these use its base types (WorkloadID, ProvisionError).
import zerostack.node.provisioners  # noqa: F401
