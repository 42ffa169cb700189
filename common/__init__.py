"""dpfpl: privacy-preserving personalized federated prompt learning on OpenCLIP with Flower."""
