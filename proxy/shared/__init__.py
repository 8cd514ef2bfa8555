"""State shared by several appliances (Redis): limits, the answer cache tier, single flight, registry."""
