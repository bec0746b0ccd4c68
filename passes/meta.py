"""Node-metadata keys the passes read and write (never string literals elsewhere)."""

# LayerScheme chosen for an aten.linear node by annotate_linears.
SCHEME = "qcompile_scheme"
# Module FQN of the linear whose weight an aten.linear node reads.
LINEAR_FQN = "qcompile_linear_fqn"
# On an activation-quant node: FQNs of the linears that read its output.
ACT_QUANT_SHARED_BY = "qcompile_act_quant_consumers"
# On the nodes of a linear's low-rank branch (down, up, add): the linear's FQN.
LOWRANK_OF = "qcompile_lowrank_of"
