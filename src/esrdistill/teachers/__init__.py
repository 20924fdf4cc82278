"""The teachers: protocol.py states the interface and every rule the training loop relies on; same.py, cross.py
(with xtok.py, the alignment across tokenizers), served.py and routed.py are its kinds. build.teacher makes one
from the config."""
