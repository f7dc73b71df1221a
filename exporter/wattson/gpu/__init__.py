"""GPU backends: where power, energy and memory numbers come from."""
