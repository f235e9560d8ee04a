from .plan import RoutingPlan
from .router import Router, RouterOutput
from .strategies import Dropless, ExpertChoice, RoutingStrategy, TokenDrop, make_strategy

__all__ = ["RoutingPlan", "Router", "RouterOutput", "RoutingStrategy", "Dropless", "TokenDrop",
           "ExpertChoice", "make_strategy"]
