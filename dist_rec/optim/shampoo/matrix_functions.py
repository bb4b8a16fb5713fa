"""Inverse roots of the Kronecker factors."""

from __future__ import annotations

from typing import Optional

import torch


def _inverse_root_eigh(matrix: torch.Tensor, root: float, epsilon: float) -> torch.Tensor:
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    # Statistics are PSD in exact arithmetic; rounding can leave the smallest
    # eigenvalue slightly negative, so shift it back to zero before damping.
    shift = torch.clamp(eigenvalues.min(), max=0.0)
    damped = eigenvalues - shift + epsilon
    return (eigenvectors * damped.pow(-1.0 / root)) @ eigenvectors.T


def inverse_root(matrix: torch.Tensor, root: float, epsilon: float) -> Optional[torch.Tensor]:
    """``matrix^(-1/root)`` of a symmetric PSD matrix, eigenvalues damped by
    ``epsilon``; None when the decomposition fails in the matrix's dtype and
    again in float64 (the caller keeps its previous root)."""
    attempts = [matrix] if matrix.dtype == torch.float64 else [matrix, matrix.double()]
    for attempt in attempts:
        try:
            result = _inverse_root_eigh(attempt, root, epsilon)
        except RuntimeError:  # torch.linalg.LinAlgError: eigh did not converge
            continue
        if torch.isfinite(result).all():
            return result.to(matrix.dtype)
    return None
