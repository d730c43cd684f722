"""AnimateDiff: motion modules, motion LoRAs and animations (hooks wired separately).

``motion`` finds, checks and loads motion modules (diffusers ``MotionAdapter`` folders and
original single files) and motion LoRAs; ``configs/`` holds the MotionAdapter configs of the
v1, v2, v3 and SDXL-beta modules so single files load offline.
"""
