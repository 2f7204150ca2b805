"""clinfuse: federated, differentially private multimodal diagnostic models for hospital consortia."""

__version__ = "0.1.0"
