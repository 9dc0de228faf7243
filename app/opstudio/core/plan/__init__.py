"""Planning: the accuracy budget and the advisors."""
