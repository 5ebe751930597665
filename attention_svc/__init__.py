"""Attention service: the public gRPC API, scheduler, attention, dense layers, shared experts."""

# How a MoE layer's rows reach the expert workers: through the router (RemoteMoE), or gated here and
# sent straight to the workers with the table the router pushes (DirectMoE). The deploy field `dispatch`.
DISPATCH_MODES = ("router", "direct")
