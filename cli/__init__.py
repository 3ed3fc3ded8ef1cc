"""fastret.cli"""
