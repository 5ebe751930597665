"""Cluster plumbing shared by the services: gRPC servers and channels, long-lived streams,
the tensor wire codec, the worker registry and the process lifecycle. No model math.
"""
