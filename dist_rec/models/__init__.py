from dist_rec.models.dlrm import DLRM, DenseArch, InteractionArch, OverArch

__all__ = ["DLRM", "DenseArch", "InteractionArch", "OverArch"]
