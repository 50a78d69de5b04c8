"""Adapters to other tools' plug-in interfaces (lmms-eval). They sit on top of the package: each may import
anything in vlmscope, nothing in vlmscope imports them, and each imports its tool only inside its own module."""
