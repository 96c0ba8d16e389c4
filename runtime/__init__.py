"""Running bundles: llama.cpp through its C API, the projector GGUF in numpy, the fusion rule
(projected rows replace placeholders), and a run's inputs. Shared by ``mmconvert run`` and
``mmconvert verify``; imports only :mod:`mmconvert.formats` and :mod:`mmconvert.errors`."""
