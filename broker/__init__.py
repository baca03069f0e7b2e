"""vTPM key broker (see ../shared/ARCHITECTURE.md); the host agent, management client and drill live in subpackages."""
