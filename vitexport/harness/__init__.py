"""The shared harness: every artifact measured the same way, on the same inputs, against the same fp32 reference.

It knows runners, not how an artifact was made.
"""
