"""TorchServe as a victim: archives of a jaxrecover model's PyTorch twin with TorchServe's VisionHandler IG
call (:mod:`.handler`), and a TorchServe process on 127.0.0.1 started and stopped by its own pid.

Needs the ``endpoints`` extra (``torchserve``, ``torch-model-archiver``) and a Java 17 runtime (Debian
``openjdk-17-jre-headless``). Archives are built by ``torch-model-archiver`` itself; TorchServe is started by
its own ``torchserve --foreground`` launcher in a new process group, so stopping it stops the Java frontend and
its Python workers together, by that group's id, never by name.
"""

from .launch import TorchServe, build_archive, free_port

__all__ = ["TorchServe", "build_archive", "free_port"]
