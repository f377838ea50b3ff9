"""The disk stack and the mirror's lifecycle: the journal, the dm stack of one disk, the mirror
and its logs, the suspend window and guard, the handover gate, the copier, the agent's
confinement. Imports adapters and basics only.
"""
