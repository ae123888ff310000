"""Platform selection and megatron parallel-state initialisation."""
