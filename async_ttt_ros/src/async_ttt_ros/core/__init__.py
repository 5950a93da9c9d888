"""ROS-free core: everything that learns, measures or decides. Imports torch and numpy only."""
