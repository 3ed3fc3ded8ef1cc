"""fastret.export"""
