"""cns-lightning: Concept Neuron Selection (CNS) for continual personalization of diffusion models."""

__version__ = "0.1.0"
