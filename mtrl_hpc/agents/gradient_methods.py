"""Per-task gradient methods: PCGrad, CAGrad and GradNorm on the fused per-task SAC losses.

A gradient method turns one optimizer's per-task loss vector [T] into the `.grad` of that optimizer's
parameters; `SACAgent.step_optimizer` calls it in place of `loss.backward()` (agent=pcgrad_state_sac,
cagrad_state_sac, gradnorm_state_sac). Components are the agent's optimizers: critic (with the encoder, and the
task encoder when the critic loss trains it), actor (with the task encoder when the actor loss trains it) and
alpha (the temperature).

Per-task gradients (`TaskGradients`), never a loop of T backward passes:
- Layers of the networks' StackedLinear / StackedLayerNorm whose rows are the batch's rows: every row belongs to
  one task and rows do not mix before the loss, so one ordinary backward of sum_t L_t gives each row's output
  gradient delta, and task t's weight gradient is x_t^T delta_t over its own rows: one batched matmul over
  [tasks, rows of a task] (the batch's TaskRouting layout), the FLOPs of one weight gradient.
- Per-task layers (heads, disjoint layers: stack s is task s % T) get their gradient from that same backward:
  only their own task reaches them.
- The task encoder runs once per task: row t of its output is task t's, so its parameters' task-t gradient is
  the backward of that row's gradient alone, all T rows in one batched backward through the task encoder.
- MOORE's mixing weights are gathered per row by task id: slice t is task t's alone, from that same backward.
- Every other parameter (the temperature, PaCo's parameter sets, ...): one batched backward,
  `torch.autograd.grad(losses, params, eye(T), is_grads_batched=True)` (vmap over the T one-hot cotangents),
  which costs about T backward passes through the layers above them.
PCGrad and CAGrad only need the T x T Gram matrix of the per-task gradients: both combine the original
gradients linearly, so their weights are found on the Gram matrix and the result is one weighted sum.
Nothing here reads a value on the host: every decision is a tensor op, so an update stays free of syncs.
"""

from __future__ import annotations

import torch

from mtrl_hpc.nets.mlp import StackedLayerNorm, StackedLinear, StackedMLP
from mtrl_hpc.nets.routing import TaskRouting

METHODS = ("pcgrad", "cagrad", "gradnorm")
# agent.name -> gradient method (mtrl's agent names).
AGENT_METHODS = {"pcgrad_state_sac": "pcgrad", "cagrad_state_sac": "cagrad", "gradnorm_state_sac": "gradnorm"}
PCGRAD_REDUCTIONS = ("sum", "mean")
GRADIENT_ENGINES = ("layers", "batched")  # agent.gradient_engine


def per_task_gradients(task_losses: torch.Tensor, params: list[torch.Tensor], retain_graph: bool = False):
    """[T, P]: row t is d task_losses[t] / d params, flattened in parameter order; plus which params got a gradient."""
    T = task_losses.shape[0]
    eye = torch.eye(T, dtype=task_losses.dtype, device=task_losses.device)
    grads = torch.autograd.grad(task_losses, params, grad_outputs=eye, is_grads_batched=True, allow_unused=True,
                                retain_graph=retain_graph)
    used = [g is not None for g in grads]
    flat = torch.cat([(g if g is not None else p.new_zeros((T, *p.shape))).reshape(T, -1) for g, p in zip(grads, params)], 1)
    return flat, used


class TaskGradients:
    """The per-task gradients of one optimizer step, [T, ...] per parameter, kept in two forms:
    dense: (param, [T, *param.shape]); per_stack: (param, its gradient, the task of each slice along `dim`, dim)
    for per-task parameters, whose task-t gradient is zero outside task t's slices."""

    def __init__(self, num_tasks: int):
        self.num_tasks = num_tasks
        self.dense: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.per_stack: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = []

    def gram(self) -> torch.Tensor:
        """[T, T]: g_i . g_j over all parameters."""
        mats = [g.reshape(self.num_tasks, -1) for _, g in self.dense]
        gram = sum(m @ m.T for m in mats)
        for _, g, task, dim in self.per_stack:
            sq = g.movedim(dim, 0).reshape(g.shape[dim], -1).pow(2).sum(1)
            gram = gram + torch.diag(torch.zeros(self.num_tasks, dtype=g.dtype, device=g.device).index_add(0, task, sq))
        return gram

    def norms(self, params: list[torch.Tensor]) -> torch.Tensor:
        """[T]: |g_t| over these parameters (dense ones)."""
        ids = {id(p) for p in params}
        sq = sum(g.reshape(self.num_tasks, -1).pow(2).sum(1) for p, g in self.dense if id(p) in ids)
        return sq.sqrt()

    def write(self, weights: torch.Tensor) -> None:
        """p.grad = sum_t weights[t] g_t for every parameter a loss reached."""
        for p, g in self.dense:
            p.grad = torch.tensordot(weights.to(g.dtype), g, dims=1)
        for p, g, task, dim in self.per_stack:
            shape = [1] * g.dim()
            shape[dim] = -1
            p.grad = g * weights.to(g.dtype)[task].view(shape)


class _Call:
    """One forward of a recorded layer: its input, its output's gradient (filled by the backward), its layout."""

    __slots__ = ("module", "x", "grad", "layout")

    def __init__(self, module, x, layout):
        self.module, self.x, self.grad, self.layout = module, x, None, layout

    def keep_grad(self, grad):
        self.grad = grad


class TaskGradientEngine:
    """Records the forwards of the networks' StackedLinear / StackedLayerNorm layers during an update (their inputs
    and, through a tensor hook registered before any in-place activation, their outputs' gradients) and turns one
    backward of the summed per-task losses into per-task gradients (module docstring). `begin(batch)` starts an
    update: it sets the row -> task layout and forgets the previous update's forwards."""

    def __init__(self, agent, enabled: bool = True):
        """enabled=False: every parameter takes the batched backward (agent.gradient_engine=batched)."""
        self.num_tasks = agent.num_tasks
        self.routing: TaskRouting | None = None
        self.calls: list[_Call] = []
        self.encodings: list[torch.Tensor] = []  # the task encoder's outputs [T, d] of this update
        self.enabled = enabled
        from mtrl_hpc.nets.moore import MOOREMLP

        per_task = set()  # layers whose stack s is task s % T, run on the TaskRouting layout
        self.sliced: dict[int, torch.Tensor] = {}  # parameters whose slice t along dim 1 only task t reads
        for m in agent.modules():
            if isinstance(m, StackedMLP):
                per_task.update(id(x) for x in (*m.heads, *m.head_norms))
            elif isinstance(m, MOOREMLP):
                per_task.add(id(m.heads))
                # compose[:, t] weighs task t's rows only (gathered by task id): a per-task slice along dim 1.
                self.sliced[id(m.compose)] = m.compose
        # The task encoder runs once per task, not per row: its layers are not in the batch's layout.
        skip = {id(m) for m in agent.task_encoder.modules()}
        self._handles = []
        for net in (agent.encoder, agent.actor, agent.critic):
            for m in net.modules():
                if isinstance(m, (StackedLinear, StackedLayerNorm)) and id(m) not in skip:
                    layout = "stacks" if id(m) in per_task else "rows"
                    self._handles.append(m.register_forward_hook(self._hook(layout)))
        # The task encoder: row t of its output is task t's, so task t's gradient of its parameters is the
        # backward of that row alone; one batched backward through the (small) task encoder gives all T.
        self.task_encoder_params = {id(p) for p in agent.task_encoder.parameters()}
        if self.task_encoder_params:
            self._handles.append(agent.task_encoder.register_forward_hook(self._record_encoding))

    def _record_encoding(self, module, inputs, output):
        if self.routing is not None and output.requires_grad and inputs[0].numel() == self.num_tasks:
            self.encodings.append(output)

    def _hook(self, layout):
        def record(module, inputs, output):
            if self.routing is None or not output.requires_grad or not module.weight.requires_grad:
                return
            x = inputs[0]
            if layout == "rows" and (x.dim() != 3 or x.shape[1] != self.routing.rows):
                layout_here = None  # not the batch's rows: this layer's parameters take the batched backward
            else:
                layout_here = layout
            call = _Call(module, x, layout_here)
            output.register_hook(call.keep_grad)
            self.calls.append(call)
        return record

    def begin(self, batch) -> None:
        self.routing = TaskRouting.from_batch(batch, self.num_tasks) if self.enabled else None
        self.calls, self.encodings = [], []

    def gradients(self, task_losses: torch.Tensor, params: list[torch.Tensor]) -> TaskGradients:
        T = self.num_tasks
        out = TaskGradients(T)
        ids = {id(p) for p in params}
        calls = [c for c in self.calls if id(c.module.weight) in ids]
        bad = {id(c.module) for c in calls if c.layout is None}
        calls = [c for c in calls if id(c.module) not in bad]
        covered = {id(t) for c in calls for t in (c.module.weight, c.module.bias)}
        encoder_params = [p for p in params if id(p) in self.task_encoder_params and p.requires_grad]
        encodings = self.encodings if encoder_params else []
        if encodings:
            covered.update(map(id, encoder_params))
        sliced = [p for p in params if id(p) in self.sliced and p.requires_grad]
        covered.update(map(id, sliced))
        # This step's forwards are used up: the next optimizer's step has its own.
        self.calls = [c for c in self.calls if id(c.module.weight) not in ids]
        if encoder_params:
            self.encodings = []
        rest = [p for p in params if id(p) not in covered and p.requires_grad]
        if rest:
            grads, used = per_task_gradients(task_losses, rest, retain_graph=bool(calls or encodings))
            offset = 0
            for p, u in zip(rest, used):
                n = p.numel()
                if u:
                    out.dense.append((p, grads[:, offset:offset + n].reshape(T, *p.shape)))
                offset += n
        if not calls and not encodings and not sliced:
            return out
        modules = list({id(c.module): c.module for c in calls}.values())
        stacked = {id(c.module) for c in calls if c.layout == "stacks"}
        # One backward of the summed losses: fills each call's output gradient; per-task layers' totals are theirs.
        # Of the other layers it asks only the biases' gradients, so that no weight gradient is formed twice.
        tensors = [t for m in modules for t in ((m.weight, m.bias) if id(m) in stacked else (m.bias,))] + sliced
        grads = torch.autograd.grad(task_losses.sum(), tensors + encodings, allow_unused=True, retain_graph=bool(encodings))
        totals = dict(zip(map(id, tensors), grads))
        self._encoder_gradients(out, encodings, grads[len(tensors):], encoder_params)
        for p in sliced:
            if totals[id(p)] is not None:
                out.per_stack.append((p, totals[id(p)], torch.arange(T, device=p.device), 1))
        dense = {}
        for c in calls:
            if c.layout == "stacks":
                continue
            for t, g in zip((c.module.weight, c.module.bias), self._per_task(c)):
                dense[id(t)] = dense[id(t)] + g if id(t) in dense else g
        for m in modules:
            for t in (m.weight, m.bias):
                if id(t) in dense:
                    out.dense.append((t, dense[id(t)]))
                else:
                    stacks = t.shape[0]
                    task = torch.arange(stacks, device=t.device) % T
                    out.per_stack.append((t, totals[id(t)], task, 0))
        return out

    def _encoder_gradients(self, out: TaskGradients, encodings, grads, params) -> None:
        """Task t's gradient of the task encoder's parameters: the backward of row t of each encoding with
        that row's gradient (rows summed over task t's batch rows by the gather), all T in one batched backward."""
        T = self.num_tasks
        total = {}
        for y, g in zip(encodings, grads):
            if g is None:
                continue  # this encoding does not reach this loss
            rows = torch.eye(T, dtype=g.dtype, device=g.device).unsqueeze(-1) * g  # [T, T, d]: row t only
            per_task = torch.autograd.grad(y, params, grad_outputs=rows, is_grads_batched=True, allow_unused=True,
                                           retain_graph=True)
            for p, gp in zip(params, per_task):
                if gp is not None:
                    total[id(p)] = total[id(p)] + gp if id(p) in total else gp
        out.dense.extend((p, total[id(p)]) for p in params if id(p) in total)

    def _per_task(self, call: _Call):
        """(weight, bias) gradients [T, *shape] of one call over the batch's rows, grouped by task."""
        T, m = self.num_tasks, call.module
        x, grad = call.x, call.grad
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(grad.shape[0], -1, -1)
        S = grad.shape[0]
        if isinstance(m, StackedLayerNorm):
            x = torch.nn.functional.layer_norm(x, x.shape[-1:])  # the normalised input the gain multiplies
            gx = self.routing.to_tasks(x * grad).view(S, T, -1, x.shape[-1]).sum(2)  # [S, T, f]
            gb = self.routing.to_tasks(grad).view(S, T, -1, grad.shape[-1]).sum(2)
            return gx.transpose(0, 1).unsqueeze(2), gb.transpose(0, 1).unsqueeze(2)
        xt = self.routing.to_tasks(x)  # [S * T, rows of a task, in]
        gt = self.routing.to_tasks(grad)
        gw = torch.bmm(xt.transpose(1, 2), gt).view(S, T, *m.weight.shape[1:]).transpose(0, 1)  # [T, S, in, out]
        gb = gt.sum(1).view(S, T, 1, -1).transpose(0, 1)  # [T, S, 1, out]
        return gw, gb


def batched_gradients(task_losses: torch.Tensor, params: list[torch.Tensor]) -> TaskGradients:
    """Every parameter's per-task gradients from the batched backward."""
    T = task_losses.shape[0]
    out = TaskGradients(T)
    grads, used = per_task_gradients(task_losses, params)
    offset = 0
    for p, u in zip(params, used):
        if u:
            out.dense.append((p, grads[:, offset:offset + p.numel()].reshape(T, *p.shape)))
        offset += p.numel()
    return out


class GradientMethod:
    """Turns one optimizer's per-task losses into its parameters' .grad. engine: per-task gradients from the
    recorded layers (None: the batched backward for every parameter)."""

    def __init__(self, num_tasks: int, engine: TaskGradientEngine | None = None):
        self.num_tasks = num_tasks
        self.engine = engine

    def begin(self, batch) -> None:
        """An update on this batch starts (its row -> task layout)."""
        if self.engine is not None:
            self.engine.begin(batch)

    def gradients(self, task_losses: torch.Tensor, params: list[torch.Tensor]) -> TaskGradients:
        if self.engine is not None and self.engine.enabled:
            return self.engine.gradients(task_losses, params)
        return batched_gradients(task_losses, params)


class PCGrad(GradientMethod):
    """Projecting Conflicting Gradients (Yu et al. 2020).

    For each task i, over the other tasks j in a random order: if g_i . g_j < 0, g_i -= (g_i . g_j / |g_j|^2) g_j,
    with g_i the partly projected gradient and g_j the original one. Every projected g_i stays a linear combination
    of the original gradients, g_i = sum_k A[i, k] g_k, so the projections run on the Gram matrix G = g g^T:
    g_i . g_j = (A G)[i, j]. The T - 1 steps are the paper's sequential order; each step handles all tasks at once.
    The result is sum_i g_i (the paper) or its mean (reduction=mean, mtrl).
    The orders come from the method's own generator, saved with the agent so a resumed run draws the same orders.
    """

    def __init__(self, num_tasks: int, device, reduction: str, seed: int, engine: TaskGradientEngine | None = None):
        if reduction not in PCGRAD_REDUCTIONS:
            raise ValueError(f"agent.pcgrad.reduction={reduction!r} is not available; choose one of {', '.join(PCGRAD_REDUCTIONS)}")
        super().__init__(num_tasks, engine)
        self.reduction = reduction
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def backward(self, name: str, task_losses: torch.Tensor, params: list[torch.Tensor]) -> None:
        grads = self.gradients(task_losses, params)
        grads.write(self.weights(grads.gram()))

    def orders(self, device) -> torch.Tensor:
        """[T, T]: row i is task i's random order over the tasks (j == i is skipped when projecting)."""
        keys = torch.rand(self.num_tasks, self.num_tasks, generator=self.generator, device=self.generator.device)
        return keys.argsort(dim=1).to(device)

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        """[T] weights w of the original gradients: the combined gradient is w @ g."""
        T = self.num_tasks
        order = self.orders(gram.device)
        rows = torch.arange(T, device=gram.device)
        coeff = torch.eye(T, dtype=gram.dtype, device=gram.device)
        sq = gram.diagonal()
        for k in range(T):  # the paper's sequential projections, all tasks in each step
            j = order[:, k]
            dot = (coeff * gram[:, j].T).sum(1)  # g_i . g_j for each i's current g_i
            conflict = (j != rows) & (dot < 0) & (sq[j] > 0)
            step = torch.where(conflict, dot / torch.where(conflict, sq[j], torch.ones_like(dot)), torch.zeros_like(dot))
            coeff = coeff.index_put((rows, j), -step, accumulate=True)
        w = coeff.sum(0)
        return w / T if self.reduction == "mean" else w

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if "generator" not in state:
            raise ValueError("the checkpoint has no PCGrad generator state (agent.name differs from the run that wrote it)")
        self.generator.set_state(state["generator"].cpu())


class CAGrad(GradientMethod):
    """Conflict-Averse Gradient descent (Liu et al. 2021).

    d = g0 + (sqrt(phi) / |g_w|) g_w with g0 the mean gradient, phi = c^2 |g0|^2 and g_w = sum_i w_i g_i, where w
    minimises the dual F(w) = g_w . g0 + sqrt(phi) |g_w| over the simplex. The dual needs only the Gram matrix:
    g_w . g0 = w . (G 1 / T), |g_w|^2 = w G w. F is convex; it is minimised by `num_iterations` steps of
    accelerated projected gradient descent (FISTA, Euclidean projection onto the simplex by sorting) from the
    uniform weights, on the Gram matrix scaled to unit mean diagonal so one step size fits any gradient scale.
    The best iterate is kept by tensor comparisons: no host sync. c = 0 gives g0, MT-SAC's gradient of the mean.
    """

    def __init__(self, num_tasks: int, c: float, num_iterations: int, lr: float, engine: TaskGradientEngine | None = None):
        super().__init__(num_tasks, engine)
        self.c, self.num_iterations, self.lr = float(c), int(num_iterations), float(lr)

    def backward(self, name: str, task_losses: torch.Tensor, params: list[torch.Tensor]) -> None:
        grads = self.gradients(task_losses, params)
        grads.write(self.weights(grads.gram()))

    def dual(self, gram: torch.Tensor):
        """(the dual's weights w over tasks [T], sqrt(phi) / |g_w|)."""
        T = self.num_tasks
        gram = gram / gram.diagonal().mean().clamp_min(torch.finfo(gram.dtype).tiny)
        b = gram.mean(1)  # g_i . g0
        sqrt_phi = self.c * b.mean().clamp_min(0).sqrt()  # |g0|^2 = mean of b
        eps = torch.finfo(gram.dtype).eps

        def norm_gw(w):
            return (w @ gram @ w).clamp_min(eps).sqrt()

        def objective(w):
            return w @ b + sqrt_phi * norm_gw(w)

        w = torch.full((T,), 1 / T, dtype=gram.dtype, device=gram.device)
        y, best, best_f, t = w, w, objective(w), 1.0
        for _ in range(self.num_iterations):
            gw = gram @ y
            grad = b + sqrt_phi * gw / (y @ gw).clamp_min(eps).sqrt()
            w_next = _project_to_simplex(y - self.lr * grad)
            t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
            y = w_next + (t - 1) / t_next * (w_next - w)
            w, t = w_next, t_next
            f = objective(w)
            better = f < best_f
            best, best_f = torch.where(better, w, best), torch.where(better, f, best_f)
        return best, sqrt_phi / norm_gw(best)

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        """[T] weights of the original gradients: d = (1 / T + lambda w) @ g with lambda = sqrt(phi) / |g_w|."""
        w, lam = self.dual(gram)
        return 1 / self.num_tasks + lam * w

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _project_to_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection onto {w >= 0, sum w = 1} (Held et al.; Duchi et al. 2008), without a host sync."""
    u = v.sort(descending=True).values
    css = u.cumsum(0) - 1
    k = torch.arange(1, v.numel() + 1, dtype=v.dtype, device=v.device)
    rho = ((u - css / k) > 0).to(v.dtype).mul(k).amax()  # the largest k whose condition holds (a prefix)
    theta = (css * (k == rho)).sum() / rho
    return (v - theta).clamp_min(0)


def last_shared_layer(model) -> list[torch.nn.Parameter]:
    """The weight and bias of the last layer every task shares, both critics' at once (mtrl's get_last_shared_layers):
    the MLP's last trunk layer (its output layer, or with per-task heads the layer before them); soft
    modularization's last modules; PaCo's last parameter sets; MOORE's experts' last layer."""
    from mtrl_hpc.nets.moore import MOOREMLP
    from mtrl_hpc.nets.paco import PaCoMLP
    from mtrl_hpc.nets.soft_modules import SoftModularMLP

    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    if isinstance(model, SoftModularMLP):
        layer = model.last
    elif isinstance(model, PaCoMLP):
        layer = model.layers[-1]
    elif isinstance(model, MOOREMLP):
        layer = model.experts.trunk[-1]
    elif isinstance(model, StackedMLP) and len(model.trunk):
        layer = model.trunk[-1]
    else:
        raise ValueError("agent=gradnorm_state_sac needs a layer shared by all tasks: "
                         f"{type(model).__name__} (a disjoint policy) has none")
    return [layer.weight, layer.bias]


class GradNorm(GradientMethod):
    """GradNorm (Chen et al. 2018): per component, learned task weights w (sum T) and the loss sum_i w_i L_i.

    G_i = |d w_i L_i / d W| on the last shared layer W, Gbar = mean_i G_i, r_i = L~_i / mean(L~) with L~_i =
    L_i / L_i(0) the loss relative to the first update's. The weights descend L_grad = sum_i |G_i - Gbar r_i^alpha|
    (the target held constant, as the paper does): dL_grad / dw_i = sign(G_i - target_i) |dL_i / dW|, by their own
    Adam, then are renormalised to sum to T. The network step uses the weights from before that step.
    Loss ratios use |L|: SAC's actor loss is often negative, and the paper's ratio assumes positive losses.
    The temperature has no shared layer: its loss is the mean over tasks, as MT-SAC's.
    Weights, their optimizers' states and the initial losses are saved with the agent (a resume continues exactly).
    """

    def __init__(self, num_tasks: int, alpha: float, lr: float, layers: dict[str, list[torch.nn.Parameter]],
                 engine: TaskGradientEngine | None = None):
        super().__init__(num_tasks, engine)
        self.alpha, self.lr = float(alpha), float(lr)
        self.layers = layers
        # Per component, made at its first update (with the losses' dtype and device).
        self.task_weights: dict[str, torch.Tensor] = {}
        self.initial_losses: dict[str, torch.Tensor] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}

    def _start(self, name: str, initial_losses: torch.Tensor) -> None:
        like = self.layers[name][0]  # the network's dtype and device (a checkpoint's tensors may be on the host)
        w = torch.ones(self.num_tasks, dtype=like.dtype, device=like.device, requires_grad=True)
        self.task_weights[name] = w
        self.initial_losses[name] = initial_losses.detach().to(like).clone()
        self.optimizers[name] = torch.optim.Adam([w], lr=self.lr)

    def backward(self, name: str, task_losses: torch.Tensor, params: list[torch.Tensor]) -> None:
        if name not in self.layers:
            task_losses.mean().backward()
            return
        if name not in self.task_weights:
            self._start(name, task_losses)
        w = self.task_weights[name]
        grads = self.gradients(task_losses, params)
        norms = grads.norms(self.layers[name])  # |dL_i / dW|
        grads.write(w.detach())  # the gradient of sum_i w_i L_i
        w.grad = self.weight_gradient(w.detach(), norms, task_losses.detach(), self.initial_losses[name])
        self.optimizers[name].step()
        with torch.no_grad():
            w.mul_(self.num_tasks / w.sum())

    def weight_gradient(self, w, norms, losses, initial) -> torch.Tensor:
        tiny = torch.finfo(losses.dtype).tiny
        g = w * norms
        ratio = losses.abs() / initial.abs().clamp_min(tiny)
        # A task without rows has loss 0 from the first update on: ratio 1, not 0 / 0.
        ratio = torch.where(initial != 0, ratio, torch.ones_like(ratio))
        rate = ratio / ratio.mean().clamp_min(tiny)
        target = g.mean() * rate.pow(self.alpha)
        return torch.sign(g - target) * norms

    def state_dict(self) -> dict:
        return {name: {"task_weights": self.task_weights[name].detach().clone(),
                       "initial_losses": self.initial_losses[name].clone(),
                       "optimizer": _adam_state(self.optimizers[name])} for name in self.task_weights}

    def load_state_dict(self, state: dict) -> None:
        for name, s in state.items():
            self._start(name, s["initial_losses"])
            with torch.no_grad():
                self.task_weights[name].copy_(s["task_weights"])
            opt = s["optimizer"]
            self.optimizers[name].load_state_dict({"state": {0: dict(opt["state"])} if opt["state"] else {},
                                                   "param_groups": [dict(opt["param_group"], params=[0],
                                                                        betas=tuple(opt["param_group"]["betas"]))]})


def _adam_state(opt: torch.optim.Optimizer) -> dict:
    # One parameter: its state and its group, as plain data (betas a list) that a state tree holds.
    sd = opt.state_dict()
    group = {k: list(v) if isinstance(v, tuple) else v for k, v in sd["param_groups"][0].items() if k != "params"}
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in sd["state"].get(0, {}).items()}
    return {"state": state, "param_group": group}


def make_gradient_method(cfg, agent, device):
    """The gradient method agent.name selects (None: MT-SAC's plain backward of the mean loss)."""
    method = AGENT_METHODS.get(cfg.name)
    T = agent.num_tasks
    if method is None:
        return None
    if cfg.compile:
        raise ValueError(f"agent={cfg.name} needs eager networks: torch.compile's backward cannot be batched over tasks "
                         "nor hooked per layer; set agent.compile=false")
    engine = TaskGradientEngine(agent, enabled=cfg.gradient_engine == "layers")
    if method == "pcgrad":
        # Seeded from torch's generator, which the run seeds before building the agent.
        seed = int(torch.randint(0, 2**62, (1,)).item())
        return PCGrad(T, device, cfg.pcgrad.reduction, seed, engine)
    if method == "cagrad":
        return CAGrad(T, cfg.cagrad.c, cfg.cagrad.num_iterations, cfg.cagrad.lr, engine)
    layers = {"critic": last_shared_layer(agent.critic.model), "actor": last_shared_layer(agent.actor.model)}
    return GradNorm(T, cfg.gradnorm.alpha, cfg.gradnorm.lr, layers, engine)
