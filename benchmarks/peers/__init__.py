"""Peer recommenders for the quality benchmark (benchmarks.quality), ranked under the product's
own protocol (DESIGN §9): the shared leave-last-out split (protocol.py), a cosine ItemKNN
(itemknn.py), implicit's ALS and BPR (implicit_mf.py) and torch-rechub's DSSM and YoutubeDNN
(rechub.py). Every peer turns the same ``Split`` into top-k lists through ``models.ranking``.
"""
