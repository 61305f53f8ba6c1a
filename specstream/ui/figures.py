"""Plotly figures as pure functions of step records (and a trace): testable without a browser."""

from __future__ import annotations

import plotly.graph_objects as go

from ..records import COPIED_SOURCES, NodeRecord, StepRecord
from ..streams import stream_attention_mask
from ..tree import Fate, tree_attention_mask
from .highlight import visible
from .race import Trace

SYMBOLS = {"lookup": "diamond", "phrase": "square"}
FATE_COLOURS = {
    Fate.ACCEPTED: "#16a34a",
    Fate.REJECTED: "#dc2626",
    Fate.PRUNED: "#9ca3af",
    Fate.UNVERIFIED: "#e5e7eb",
}
METHOD_COLOURS = {"plain": "#6b7280", "specstream": "#2563eb"}
FONT = dict(family="system-ui, sans-serif", size=13)


def _layout(fig: go.Figure, title: str, height: int = 320, **axes) -> go.Figure:
    fig.update_layout(
        title=dict(text=title, x=0.01, font=dict(size=14)), height=height, font=FONT, template="plotly_white",
        margin=dict(l=48, r=12, t=44, b=40), legend=dict(orientation="h", y=-0.18),
        # Zoom and pan fight page scrolling on a phone and the figures are small: keep only the download.
        modebar=dict(remove=["zoom", "pan", "select", "lasso", "zoomIn", "zoomOut", "autoScale", "resetScale"]),
        **axes,
    )
    return fig


def empty_figure(message: str, height: int = 320) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, font=dict(size=14, color="#6b7280"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, "", height)


def tree_positions(nodes: tuple[NodeRecord, ...]) -> dict[int, tuple[float, float]]:
    """(x = depth, y) for each node: leaves on consecutive rows, a parent centred on its children."""
    children: dict[int, list[int]] = {n.index: [] for n in nodes}
    for node in nodes[1:]:
        children[node.parent].append(node.index)
    positions: dict[int, tuple[float, float]] = {}
    next_row = [0.0]

    def place(index: int) -> float:
        kids = sorted(children[index], key=lambda i: nodes[i].rank)
        row = sum(place(k) for k in kids) / len(kids) if kids else next_row[0]
        if not kids:
            next_row[0] += 1
        positions[index] = (float(nodes[index].depth), -row)
        return row

    place(0)
    return positions


def _node_hover(node: NodeRecord, record: StepRecord) -> str:
    nodes = record.nodes
    if node.parent < 0:
        head = f"<b>root</b> {visible(node.text)!s}<br>the last accepted token"
    elif node.source in COPIED_SOURCES:
        matched = f", found by the text's last {record.copied_key} token{'s' * (record.copied_key > 1)}"
        head = f"<b>{visible(node.text)}</b> · {node.fate.value}<br>{COPIED_SOURCES[node.source]}{matched}"
    else:
        head = (f"<b>{visible(node.text)}</b> · {node.fate.value}<br>stream {node.stream} · "
                f"draft p={node.draft_prob:.3f} · rank {node.rank + 1}")
    score = "not computed" if node.prune_score is None else f"{node.prune_score:.3f}"
    text = f"{head}<br>pruning score: {score}"
    if node.index in record.stream_nodes:
        text += "<br>its streams were computed in this pass"
    elif record.second_pass and node.index == record.accepted_path[-1]:
        text += "<br>its streams took a short second pass" + (" (the path was unlikely to end here)" if record.stream_nodes else "")
    wanted = nodes[node.parent].main_choice_text if node.parent >= 0 else None
    if node.fate == Fate.REJECTED and wanted is not None:
        text += f"<br>the model wanted: {visible(wanted)}"
    return text


def _edges(record: StepRecord, positions, on_path: bool) -> go.Scatter:
    path = set(record.accepted_path)
    xs: list[float | None] = []
    ys: list[float | None] = []
    for node in record.nodes[1:]:
        if (node.index in path) == on_path:
            (x0, y0), (x1, y1) = positions[node.parent], positions[node.index]
            xs += [x0, x1, None]
            ys += [y0, y1, None]
    line = dict(color="#15803d", width=5) if on_path else dict(color="#cbd5e1", width=1.5)
    return go.Scatter(x=xs, y=ys, mode="lines", line=line, hoverinfo="skip", showlegend=on_path,
                      name="accepted path" if on_path else "drafted edges")


def tree_figure(record: StepRecord | None) -> go.Figure:
    """The selected step's drafted tree: nodes by depth, coloured by fate, accepted path in bold."""
    if record is None or not record.nodes:
        return empty_figure("Run a prompt, then pick a step to see its drafted tree.", 420)
    positions = tree_positions(record.nodes)
    fig = go.Figure([_edges(record, positions, False), _edges(record, positions, True)])
    for fate, colour in FATE_COLOURS.items():
        nodes = [n for n in record.nodes if n.fate is fate]
        fig.add_trace(go.Scatter(
            x=[positions[n.index][0] for n in nodes], y=[positions[n.index][1] for n in nodes],
            mode="markers+text", name=fate.value, text=[visible(n.text) for n in nodes],
            textposition=["top center" if n.parent < 0 else "middle right" for n in nodes], textfont=dict(size=12),
            marker=dict(size=[20 if n.parent < 0 else 14 for n in nodes], color=colour,
                        symbol=[SYMBOLS.get(n.source, "circle") for n in nodes],
                        line=dict(color="#374151", width=1)),
            hovertext=[_node_hover(n, record) for n in nodes], hoverinfo="text",
        ))
    rows = max(1, len({y for _, y in positions.values()}))
    depth = max(n.depth for n in record.nodes)
    title = (f"Step {record.step}: {len(record.nodes) - 1} drafted, {record.accepted_length} accepted "
             f"+ bonus {visible(record.emitted_texts[-1]) if record.emitted_texts else ''}")
    fig.update_xaxes(tickvals=list(range(depth + 1)), ticktext=["root"] + [f"depth {d}" for d in range(1, depth + 1)],
                     range=[-0.3, depth + 0.9])
    fig.update_yaxes(visible=False)
    return _layout(fig, title, height=max(300, min(720, 80 + 20 * rows)))


def accepted_per_step_figure(trace: Trace) -> go.Figure:
    steps = trace.specstream.records[1:]
    if not steps:
        return empty_figure("No Speculative Streaming steps yet.")
    fig = go.Figure(go.Bar(x=[r.step for r in steps], y=[r.accepted_length for r in steps],
                           marker_color=METHOD_COLOURS["specstream"], name="accepted drafted tokens",
                           hovertemplate="step %{x}: %{y} accepted<extra></extra>"))
    return _layout(fig, "Accepted drafts per step (plus one bonus token each)",
                   xaxis_title="step", yaxis_title="accepted", yaxis=dict(dtick=1))


def race_figure(trace: Trace) -> go.Figure:
    """Cumulative tokens against each decoder's own clock: the race as a plot."""
    fig = go.Figure()
    for side in (trace.plain, trace.specstream):
        clock, times, totals = 0.0, [0.0], [0]
        for record in side.records:
            clock += record.seconds
            times.append(clock)
            totals.append(record.total_tokens)
        fig.add_trace(go.Scatter(x=times, y=totals, mode="lines+markers", line_shape="hv", name=side.method,
                                 marker=dict(size=4), line=dict(color=METHOD_COLOURS[side.method])))
    return _layout(fig, "The race: tokens vs decoding time", xaxis_title="seconds", yaxis_title="tokens")


def acceptance_by_depth_figure(trace: Trace) -> go.Figure:
    """Of the steps whose tree reached depth d, the share whose accepted path reached depth d."""
    steps = [r for r in trace.specstream.records[1:] if r.nodes]
    depth = max((n.depth for r in steps for n in r.nodes), default=0)
    if not depth:
        return empty_figure("No drafted trees yet.")
    depths = list(range(1, depth + 1))
    rates = []
    for d in depths:
        reached = [r for r in steps if any(n.depth == d for n in r.nodes)]
        rates.append(sum(r.accepted_length >= d for r in reached) / len(reached) if reached else 0.0)
    fig = go.Figure(go.Bar(x=depths, y=rates, marker_color="#16a34a",
                           hovertemplate="depth %{x}: %{y:.0%} of steps<extra></extra>"))
    return _layout(fig, "Acceptance by tree depth", xaxis_title="depth", yaxis_title="accepted",
                   yaxis=dict(range=[0, 1], tickformat=".0%"), xaxis=dict(dtick=1))


def pass_time_figure(trace: Trace) -> go.Figure:
    fig = go.Figure()
    for side in (trace.plain, trace.specstream):
        steps = side.records[1:]  # the prefill pass would dwarf the rest
        fig.add_trace(go.Scatter(x=[r.step for r in steps], y=[r.seconds * 1000 for r in steps], mode="lines+markers",
                                 name=side.method, marker=dict(size=4), line=dict(color=METHOD_COLOURS[side.method])))
    return _layout(fig, "Time per forward pass (no prefill)", xaxis_title="step", yaxis_title="ms")


def _stream_sources(record: StepRecord, kept: list[NodeRecord]) -> list[NodeRecord]:
    """The kept nodes whose streams the pass computed."""
    carried = set(record.stream_nodes)
    return [n for n in kept if n.index in carried]


def mask_labels(record: StepRecord, gamma: int, sparse: bool = False) -> list[str]:
    """Row labels: each kept tree node, then the streams of the nodes that carried them. `sparse`
    names a node's streams once, on its first stream row, so a large mask stays legible."""
    kept = [n for n in record.nodes if n.fate is not Fate.PRUNED]
    main = [f"{visible(n.text)} (d{n.depth})" for n in kept]
    sources = _stream_sources(record, kept)
    if sparse:
        streams = [f"S1–{gamma} of {visible(n.text)}" if j == 1 else "" for n in sources for j in range(1, gamma + 1)]
    else:
        streams = [f"S{j}·{visible(n.text)}" for n in sources for j in range(1, gamma + 1)]
    return main + streams


def attention_mask_figure(record: StepRecord | None, gamma: int) -> go.Figure:
    """The top layers' attention mask of one tree pass: tree rows, then the streams of the nodes
    that carried them (all, or where the path was likely to end). Pruned nodes never reach the top
    layers, so they are left out; the cached prefix, which every row sees, is left out too."""
    if record is None or not record.nodes:
        return empty_figure("Pick a step to see its attention mask.", 420)
    gamma = record.stream_depth or gamma
    kept = [n for n in record.nodes if n.fate is not Fate.PRUNED]
    row_of = {n.index: row for row, n in enumerate(kept)}
    parents = [row_of.get(n.parent, -1) for n in kept]
    sources = [row_of[n.index] for n in _stream_sources(record, kept)]
    mask = stream_attention_mask(tree_attention_mask(parents), sources, gamma).tolist()
    full_labels = mask_labels(record, gamma)
    labels = mask_labels(record, gamma, sparse=len(full_labels) > 40)
    # 1 = a tree row sees it, 2 = a stream row sees it: two colours so the two kinds read apart.
    values = [[(1 if i < len(kept) else 2) * int(v) for v in row] for i, row in enumerate(mask)]
    hover = [[f"{full_labels[i]} {'sees' if v else 'does not see'} {full_labels[j]}" for j, v in enumerate(row)]
             for i, row in enumerate(mask)]
    colours = [[0, "#ffffff"], [0.33, "#ffffff"], [0.34, "#2563eb"], [0.66, "#2563eb"], [0.67, "#16a34a"], [1, "#16a34a"]]
    size = len(labels)
    fig = go.Figure(go.Heatmap(z=values, colorscale=colours, zmin=0, zmax=2, showscale=False, xgap=1, ygap=1,
                               text=hover, hoverinfo="text"))
    # Rows are labelled; columns are the same slots in the same order, so one label set suffices.
    fig.update_yaxes(autorange="reversed", tickvals=list(range(size)), ticktext=labels, tickfont=dict(size=9),
                     showgrid=False, zeroline=False, constrain="domain")
    fig.update_xaxes(showticklabels=False, title_text="attended slot (same order as the rows)", scaleanchor="y",
                     constrain="domain", showgrid=False, zeroline=False)
    fig.add_hline(y=len(kept) - 0.5, line=dict(color="#374151", width=1, dash="dot"))
    fig.add_vline(x=len(kept) - 0.5, line=dict(color="#374151", width=1, dash="dot"))
    return _layout(fig, f"Attention mask of step {record.step}: tree rows (blue), stream rows (green)",
                   height=max(380, min(1100, 120 + 10 * size)))
