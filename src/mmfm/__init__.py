"""mmfm: MM-FM (flow matching with a fitted Gaussian-mixture source and mode coupling) as a pipeline."""

__version__ = "0.1.0"
