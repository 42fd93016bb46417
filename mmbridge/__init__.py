"""mmbridge: vision encoder → modality bridge → causal LM, trained in stages."""

__version__ = "0.1.0"
