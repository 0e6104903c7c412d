"""Real adapters: one per component, each doing its PD's I/O outside the PD's handler."""
