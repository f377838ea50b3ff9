"""Entry points: the CLI, the destination agent, the Xen block script's hotplug. Nothing
imports them but each other and __main__.
"""
