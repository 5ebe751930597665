"""Attention service: the public gRPC API, scheduler, attention, dense layers, shared experts."""
