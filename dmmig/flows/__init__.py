"""Flows: the per-disk verbs (copy, cutover, handover, finish, verify, abort), the per-domain
migration and status. Import core, adapters and basics.
"""
