from dist_rec.models.dlrm import DLRM, DLRM_DCN, DCNInteractionArch, DenseArch, InteractionArch, LowRankCrossNet, OverArch

__all__ = ["DLRM", "DLRM_DCN", "DCNInteractionArch", "DenseArch", "InteractionArch", "LowRankCrossNet", "OverArch"]
