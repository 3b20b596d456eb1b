"""Export: deployable programs (torch.export, ONNX) and BioImage Model Zoo packages."""
