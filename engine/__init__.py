"""fastret.engine"""
