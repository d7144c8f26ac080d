"""Example tool modules: copy one next to your code and name it in TOOL_MODULES (README: "Add your own tools")."""
