"""Models: loaders for the base LLM, MoE-LoRA adapters and the FedAMoLE/DDOME adapters, routing
hooks."""
