"""flagger"""
