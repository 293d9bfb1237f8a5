"""The Zero-OS node agent: identity, registration, reconcile engine, provisioners, reports."""
