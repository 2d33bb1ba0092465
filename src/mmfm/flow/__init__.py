"""Flow-matching core in the paper's convention (t = 0 source, t = 1 data).

path (linear interpolant, RAE adapter) · time (samplers, shift, grids) · sources (Gaussian, GMM) ·
couplings (independent, mode, minibatch OT) · loss · solvers (Euler, Heun, midpoint, dopri5) ·
guidance (autoguidance, CFG) · gm (GMFlow's mixture algebra; GM-ODE / GM-SDE in solvers, probabilistic
guidance) · flowmap (Decoupled MeanFlow: proposals, robust log loss, JVP / FD time derivative, guidance
transforms, flow-map samplers).
"""

from mmfm.flow.couplings import IndependentCoupling, MinibatchOTCoupling, ModeCoupling, make_coupling
from mmfm.flow.flowmap import (
    DMF_DERIVATIVES, DMF_GUIDANCE, FLOWMAP_SOLVERS, FlowMapTimes, guided_velocity, mean_flow_target,
    robust_log_loss, solve_flowmap, time_derivative,
)
from mmfm.flow.gm import CellMixture, GMOutput
from mmfm.flow.guidance import Autoguidance, ClassifierFreeGuidance, ProbabilisticGuidance
from mmfm.flow.loss import velocity_loss
from mmfm.flow.path import LinearPath, RAEConvention
from mmfm.flow.solvers import GM_SOLVERS, ODEResult, gm_substeps, solve_gm, solve_ode
from mmfm.flow.sources import GaussianMixtureSource, GaussianSource
from mmfm.flow.time import TimeSampler, rae_time_grid, shift_factor, shift_time, time_grid

__all__ = [
    "DMF_DERIVATIVES", "DMF_GUIDANCE", "FLOWMAP_SOLVERS", "FlowMapTimes", "guided_velocity", "mean_flow_target",
    "robust_log_loss", "solve_flowmap", "time_derivative",
    "GM_SOLVERS", "Autoguidance", "CellMixture", "ClassifierFreeGuidance", "GMOutput", "GaussianMixtureSource",
    "GaussianSource", "IndependentCoupling", "LinearPath", "MinibatchOTCoupling", "ModeCoupling", "ODEResult",
    "ProbabilisticGuidance", "RAEConvention", "TimeSampler", "gm_substeps", "make_coupling", "rae_time_grid",
    "shift_factor", "shift_time", "solve_gm", "solve_ode", "time_grid", "velocity_loss",
]
