"""The control channel between a proxy and the agents and stores it talks to."""
