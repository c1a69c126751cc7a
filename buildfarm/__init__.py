"""buildfarm: a build coordinator for GNU Guix build farms."""

__version__ = "0.1.0"
