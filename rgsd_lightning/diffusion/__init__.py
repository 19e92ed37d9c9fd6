"""(filled in by the stage that builds it)"""
