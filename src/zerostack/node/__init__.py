"""The Zero-OS node agent: identity, registration, reconcile engine, provisioners, reports.

Public pieces: `node.agent.NodeAgent`/`AgentConfig` (the daemon), `node.engine.plan` and
`Executor` (the generic reconcile engine), `node.provisioners` (the `Provisioner`
interface, the `PROVISIONERS` registry and `INSTALL_ORDER`), `node.state.NodeState`.
"""
